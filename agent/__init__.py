"""skyferry: store-and-forward sync agent for edge sites behind an intermittent satellite link."""

__version__ = "0.1.0"
