"""Drives a live gateway with a client openapi-python-client generated from its /openapi.json
(tests/tests/openapi.rs generates it into the package `gateway_client` on PYTHONPATH): submit,
poll until the end, read the result. Prints one JSON line with what it saw.

Usage: python generated_client.py <gateway base URL>
"""

import json
import sys
import time

from gateway_client import Client
from gateway_client.api.operations import get_operation, get_result
from gateway_client.api.routes import submit_orders
from gateway_client.models import Order

base = sys.argv[1]
client = Client(base_url=base, raise_on_unexpected_status=False)
seen = {}

# The route names its JSON Schema (gateway/config/schemas/orders.json): the generated submit
# takes the model generated from it (named by the schema's title).
submitted = submit_orders.sync_detailed(
    client=client,
    body=Order(sku="generated", qty=2),
    idempotency_key='"generated-1"',
)
seen["submit_status"] = submitted.status_code
accepted = submitted.parsed
seen["id"] = accepted.id
seen["location"] = submitted.headers.get("location")

deadline = time.monotonic() + 20
status = None
while time.monotonic() < deadline:
    operation = get_operation.sync(accepted.id, client=client)
    status = str(operation.status.value if hasattr(operation.status, "value") else operation.status)
    if status != "pending":
        break
    time.sleep(0.2)
seen["status"] = status

result = get_result.sync_detailed(accepted.id, client=client)
seen["result_status"] = result.status_code
seen["result_body"] = json.loads(result.content)
seen["parsed_is_file"] = type(result.parsed).__name__ == "File"
print(json.dumps(seen))
