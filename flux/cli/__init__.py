"""Floor 4, the `flux` command. Thin: it parses arguments and calls the public functions a user imports."""
