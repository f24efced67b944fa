"""herder's driver for Amazon EC2 (``cloud.driver: aws``)."""
