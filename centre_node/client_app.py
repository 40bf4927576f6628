"""The centre's Flower ClientApp (thin): route ``query.<action>`` messages to :class:`CentreNode`.

The node config (``flower-supernode --node-config``) names the centre: ``centre-id``, ``data``,
``key-dir``, ``work-dir``, ``preset``, ``seed`` (and optionally ``fault``, ``labels-csv``).
Under the simulation runtime a node has only ``partition-id``; its config is then the entry of
that index in the JSON list named by the ``HISTODD_SIM_NODES`` environment variable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from histodd_fed.allocator import keep_freed_memory
from histodd_fed.errors import ConfigError
from histodd_fed.federation.centre import CentreConfig, CentreNode
from histodd_fed.federation.envelope import ACTIONS, Envelope, ProtocolError
from histodd_fed.federation.flower_records import envelope_to_recorddict, recorddict_to_envelope
from histodd_fed.federation.reply_errors import error_fields

SIM_NODES_ENV = "HISTODD_SIM_NODES"

keep_freed_memory()  # a SuperNode's app process (deployment) gets the same malloc settings as the CLIs

app = ClientApp()


def centre_config(context: Context) -> CentreConfig:
    """This node's CentreConfig from its node config (or the simulation node table)."""
    nc = dict(context.node_config)
    if "centre-id" not in nc and "partition-id" in nc:
        table = os.environ.get(SIM_NODES_ENV)
        if not table:
            raise ConfigError(f"simulated node {nc['partition-id']}: {SIM_NODES_ENV} is not set")
        nodes = json.loads(Path(table).read_text())
        pid = int(nc["partition-id"])
        if not 0 <= pid < len(nodes):
            raise ConfigError(f"{table}: no entry for partition {pid}")
        nc = nodes[pid]
    return CentreConfig.from_node_config(nc)


def handle(msg: Message, context: Context) -> Message:
    """Decode, run the action on this centre, encode the reply."""
    action = msg.metadata.message_type.split(".", 1)[-1]
    try:
        node = CentreNode(centre_config(context))
        request = recorddict_to_envelope(msg.content)
    except (ConfigError, ProtocolError) as exc:  # a code and a fixed message leave; the detail is logged
        reply = Envelope(body={"ok": False, **error_fields(exc, str(context.node_config.get("centre-id", "?")),
                                                           action)})
    else:
        reply = node.handle(action, request, run_id=context.run_id, node_id=context.node_id)
    return Message(envelope_to_recorddict(reply), reply_to=msg)


for _action in ACTIONS:
    app.query(_action)(handle)
