"""The fleet dashboard: plain HTML/CSS/JS pages served by the hub, fed by JSON and server-sent events.

Everything is served by the hub itself (no CDN, no build step): ``static/`` holds the pages, one
script and one stylesheet; charts are inline SVG drawn by that script. :func:`router.mount` adds the
routes to the hub's app. Reads use the API's read auth (anonymous or token, by config); writes go
through the API's own command endpoint and therefore need a write token.
"""
