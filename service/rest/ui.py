"""The web page at ``/ui``: static assets served by propserve itself (no build step, no CDN).

The page calls the same ``/v1`` API as any client, with the token the user enters.
"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
