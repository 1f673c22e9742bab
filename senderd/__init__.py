"""senderd: a sender to SAP Cloud Integration integration flows, safe and unattended."""

__version__ = "0.1.0"
