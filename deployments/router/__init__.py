"""The ingress: HTTP routes, authentication, the edge middleware, and the router's side of
video jobs.
"""
