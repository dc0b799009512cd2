"""Evidence an examiner can take away.

For a period: ``pack`` verifies the archive, ``facts`` derives every figure from its records
and the inputs given (policy files, the adversarial-suite report, a coverage result),
``html`` and ``pdf`` render the same facts (inline CSS and SVG ``charts``), and ``manifest``
signs the hashes of the files with the checkpoint key (``evidence verify`` checks them).

Beside it: ``coverage`` reads live Envoys' ``/config_dump`` and reports every route that
ext_authz does not cover or that fails open (``CoverageMonitor`` runs it periodically in the
service), and ``incident`` lists every decision for one user or session.
"""
