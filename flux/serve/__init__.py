"""Floor 4: `flux serve`, an OpenAI-compatible image server (command.py, app.py, fields.py, worker.py, page.html).
Needs the `serve` extra: pip install "flux[serve]"."""
