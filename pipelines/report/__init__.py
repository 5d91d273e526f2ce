"""What the `report` stage renders beyond Markdown: `html` (the run's one-file HTML page, from a Jinja2
template in `templates/`)."""
