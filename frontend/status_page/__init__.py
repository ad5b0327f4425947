"""A small local web page that shows a running queue (or one training) and takes its two requests.

``server.py`` serves it (standard library only), ``files.py`` decides which files may be served,
``view.py`` turns the queue's status file into what the page draws, and ``static/`` holds the page
itself (plain HTML, CSS and JavaScript that polls ``/api/status`` once a second).
"""

from .server import StatusPage, start_status_page

__all__ = ["StatusPage", "start_status_page"]
