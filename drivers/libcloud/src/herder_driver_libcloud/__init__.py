"""herder's ``libcloud`` driver: any compute provider apache-libcloud speaks to."""
