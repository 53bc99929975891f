"""A minimal Django project with the middleware in ``wsgi.py`` and ``asgi.py``."""
