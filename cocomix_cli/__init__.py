"""The `cocomix` command line: thin Typer commands that load the config and call one `pipelines` stage."""
