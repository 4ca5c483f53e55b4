"""OpenAI-compatible HTTP protocol shared by the decode node and the router.

`protocol` holds the request models, `responses` the response models and `errors` the
OpenAI-shaped error layer (exception type, FastAPI handlers, body-size middleware).
"""
