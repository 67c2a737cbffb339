"""The quarantine dashboard (``/admin/ui``): signed session cookies, server-rendered HTML and
its stylesheet. No JavaScript and no build step; the routes are in ``service.routes.ui``."""
