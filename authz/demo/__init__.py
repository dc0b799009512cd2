"""The local demo and end-to-end harness: Envoy bootstrap rendering, the echo upstream and a
process launcher (:class:`authz.demo.stack.Stack`) that runs every real component on loopback.

Not imported by the service: it is development and test tooling shipped with the package.
"""
