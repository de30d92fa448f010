"""An S3-compatible server on 127.0.0.1 (moto's ThreadedMotoServer, as Ray's and pyarrow's suites use) and the
standard variables that point pyarrow, boto3 and MLflow at it. Set before Ray starts, so workers inherit them."""

from __future__ import annotations

import logging
import os

BUCKET = "vitlab"
# Test credentials: moto accepts any; real ones must never be needed (nothing leaves 127.0.0.1).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.url = ""

    def start(self) -> S3Server:
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ENDPOINT_URL_S3": self.url, "MLFLOW_S3_ENDPOINT_URL": self.url,
                **CREDENTIALS}

    def create_bucket(self, name: str = BUCKET) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.url, **_boto_credentials()).create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, prefix: str = "", bucket: str = BUCKET) -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.url, **_boto_credentials())
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def stop(self) -> None:
        self.server.stop()


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": CREDENTIALS["AWS_DEFAULT_REGION"]}


def point_at(server: S3Server) -> dict[str, str | None]:
    """Set the S3 variables in this process; returns the previous values (for restore)."""
    before = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    return before
