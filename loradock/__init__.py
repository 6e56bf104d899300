"""loradock's command line: the composition root. Nothing else imports this package."""

__version__ = "0.1.0"
