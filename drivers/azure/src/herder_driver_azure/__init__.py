"""herder's driver for Microsoft Azure virtual machines (``cloud.driver: azure``)."""
