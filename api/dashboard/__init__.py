"""The internal web dashboard: server-rendered pages (Jinja2) with a little plain JavaScript.

Pages read jobs through the API's session; every change (submit, cancel, retry) is a call
from the browser to the REST API itself, so the dashboard has no rules of its own."""
