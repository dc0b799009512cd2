"""stepup-authz: an Envoy ext_authz service that enforces step-up authentication."""

__version__ = "0.1.0"


def version() -> str:
    """The installed version (``__version__`` for a checkout that is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("stepup-authz")
    except metadata.PackageNotFoundError:
        return __version__
