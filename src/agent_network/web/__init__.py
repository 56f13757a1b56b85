"""The Agent Network web app: server-rendered pages under ``/app`` (Jinja2 + htmx), its packaged
static assets, and the offline API docs page. It sits in the top layer beside ``api/``: it uses
the services and the API's credential rule, and nothing below imports it. Design:
docs/webapp.md.
"""

from agent_network.web.app import mount_web

__all__ = ["mount_web"]
