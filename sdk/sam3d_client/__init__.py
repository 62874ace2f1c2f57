"""The Python SDK of sam3d-jobs (and the ``sam3d-client`` command line, ``sam3d_client.cli``).

Its own distribution (``sdk/pyproject.toml``): no dependencies beyond Python, numpy and Pillow
only for array inputs, and nothing of the server.

>>> from sam3d_client import Client
>>> job = Client("http://127.0.0.1:8000").submit("photo.jpg", masks)
"""

from sam3d_client.errors import InvalidInput, JobCanceled, JobFailed, ServiceError
from sam3d_client.sdk import Artifact, Client, Job, ObjectMetadata, ObjectResult, Result

__all__ = [
    "Artifact",
    "Client",
    "InvalidInput",
    "Job",
    "JobCanceled",
    "JobFailed",
    "ObjectMetadata",
    "ObjectResult",
    "Result",
    "ServiceError",
]
