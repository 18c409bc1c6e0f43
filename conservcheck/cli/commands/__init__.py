"""The commands of ``conservcheck``, one module each; :mod:`conservcheck.cli.app` registers them."""
