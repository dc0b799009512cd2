"""The step-up flow: the endpoints Envoy routes ``/_stepup/*`` to, with ext_authz off.

``endpoints`` (login, start, callback), ``state`` (the one-time state between start and
callback), ``link`` (the signed step-up link the Check's redirect carries), ``oidc`` (the
relying party: discovery, authorization request, code exchange, ID token), ``pages``.
A proven factor becomes a grant only through ``authz.core.grants``.
"""
