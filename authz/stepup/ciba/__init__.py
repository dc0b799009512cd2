"""Push step-up for API clients through the IdP's OpenID CIBA endpoint (poll mode).

An API client that got the RFC 9470 challenge, and cannot send its user through a browser,
asks the service to push the step-up to the user's phone; the user approves there; the
service records the grant for the client's session; the client's retried request is
allowed. docs/ciba.md is the client's guide; the modules, in the order a request meets them:

    handlers.py     POST <prefix>/ciba (start), GET <prefix>/ciba/<id> (the outcome)
    request.py      the client's start request, the level and action it names, the binding
                    message, the record kept while the request runs
    flow.py         identify, start, poll, approve: the rules, the audit trail, the metrics
    backchannel.py  the IdP's backchannel endpoint and the token endpoint's CIBA grant
    poller.py       one task per process that polls what this process started
    service.py      built from the settings by the composition root
"""
