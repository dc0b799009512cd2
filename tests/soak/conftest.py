"""The soak run is long (``SOAK_SECONDS``, default 300): the default test run deselects it
(``-m "not soak"`` in pyproject's addopts); ``make soak`` selects it with ``-m soak``."""
