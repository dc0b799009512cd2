"""The Check path: Envoy -> request adapter -> core pipeline -> response adapter.

``grpc_server`` (ext_authz v3 gRPC) and ``http_server`` (Envoy's HTTP ext_authz mode) are
the two listeners; ``request`` turns what each receives into ``RequestAttributes``;
``authorizer`` gathers the token, device and session state and runs the one decision
pipeline of ``authz.core.decision``; ``response`` turns the decision into Envoy's answer.
"""
