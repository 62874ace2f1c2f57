"""Clients of sam3d-jobs: the ``sam3d-jobs`` command line and the Python SDK.

>>> from client import Client
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
