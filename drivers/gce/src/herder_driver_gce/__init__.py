"""herder's driver for Google Compute Engine (``cloud.driver: gce``)."""
