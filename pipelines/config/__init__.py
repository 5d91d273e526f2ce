"""The configuration: `schema` (one typed dataclass per `cocomix.toml` section), `loading` (TOML, `--set` and
flags, checked), `render` (`cocomix config show` and docs/CONFIG.md)."""
