"""A FastAPI app whose middleware options come from AGENTSIGHT_TEST_OPTIONS (JSON), as
the README's add_middleware() line: the configuration-error tests run it under uvicorn."""

from __future__ import annotations

import json
import os

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from agentsight_middleware import AgentSightMiddleware

app = FastAPI()


@app.get("/", response_class=HTMLResponse)
def page() -> str:
    return "<p>hi</p>"


app.add_middleware(AgentSightMiddleware, **json.loads(os.environ["AGENTSIGHT_TEST_OPTIONS"]))
