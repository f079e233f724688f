"""Runner-to-runner messaging over TCP: the Trio layer around ``core.protocol``."""
