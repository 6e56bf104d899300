"""Scale-out on Ray Serve: an OpenAI ingress and multiplexed engine replicas (``loradock[ray]``).

``loradock serve --ray`` (or ``serve run`` with the YAML from `serve.ray.app.write_config`)
deploys `serve.ray.ingress.Ingress` (the same FastAPI app as ``loradock serve``) in front of
`serve.ray.replica.EngineReplica` (our engines), routed by Ray Serve's model multiplexing: the
multiplexed model id of a request is the adapter's content id (`serve.ray.catalog.content_id`).

Nothing outside this package imports it, and ray itself is imported only inside its modules.
Where the job ends: Ray plumbing; HTTP is `serve.http`'s, generation the engines'.
"""
