"""stepup-authz: an Envoy ext_authz service that enforces step-up authentication."""

__version__ = "0.1.0"
