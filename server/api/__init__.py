"""The HTTP edge: FastAPI app, auth, pydantic schemas, routes. The only place pydantic lives."""
