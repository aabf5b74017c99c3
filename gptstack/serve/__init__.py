"""`gptstack serve`: the OpenAI-compatible HTTP API over the one engine (app.py: routes; api.py: requests, answers
and errors; worker.py: the thread that owns the model) and the web chat page (static/)."""
