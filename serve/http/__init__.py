"""The OpenAI-compatible HTTP front (see `serve.http.app.create_app`)."""
