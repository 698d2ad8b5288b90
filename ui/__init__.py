"""The Gradio front end: thin, calls the session, renders its reports."""
