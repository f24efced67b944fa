"""SSH for herder: the default executor (:mod:`herder.ssh.executor`) and an in-process SSH
server (:mod:`herder.ssh.server`) used by tests and by the loopback driver.

Both sides are built on paramiko's transport and channel API.  This module holds the one
channel helper both need: paramiko sends a channel's EOF (and a server's exit status) *outside*
the channel lock, so a CLOSE produced concurrently by the transport thread can overtake it.
OpenSSH answers a message for a channel it already freed by dropping the whole connection, which
kills every other command multiplexed on it.  :func:`send_while_open` sends such a message only
while the channel is open, atomically with respect to its close.
"""

from __future__ import annotations

import paramiko
from paramiko.common import cMSG_CHANNEL_EOF, cMSG_CHANNEL_REQUEST

__all__ = ["send_eof", "send_exit_status", "send_while_open"]


def send_while_open(
    channel: paramiko.Channel, message: paramiko.Message, *, eof: bool = False
) -> bool:
    """Send ``message`` on ``channel`` unless the channel is closed; return whether it was sent.

    The check and the send happen under the channel lock, which paramiko's close path also
    takes, so our message always precedes our CLOSE on the wire.  While a key exchange is in
    progress the send cannot be done under the lock (the transport thread may need the lock to
    finish the exchange), so it falls back to paramiko's ordinary, unordered send: the race then
    stays possible only during a re-key.
    """
    transport = channel.get_transport()
    with channel.lock:
        if channel.closed or not channel.active or (eof and channel.eof_sent):
            return False
        with transport.clear_to_send_lock:
            if transport.clear_to_send.is_set():
                if eof:
                    channel.eof_sent = True
                transport._send_message(message)  # type: ignore[attr-defined]
                return True
    if eof:
        channel.shutdown_write()
    else:
        transport._send_user_message(message)  # type: ignore[attr-defined]
    return True


def send_eof(channel: paramiko.Channel) -> bool:
    """Tell the remote end no more stdin is coming (unless the channel is already closed)."""
    message = paramiko.Message()
    message.add_byte(cMSG_CHANNEL_EOF)
    message.add_int(channel.remote_chanid)
    return send_while_open(channel, message, eof=True)


def send_exit_status(channel: paramiko.Channel, status: int) -> bool:
    """Report a command's exit status (server side) unless the client already closed."""
    message = paramiko.Message()
    message.add_byte(cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("exit-status")
    message.add_boolean(False)
    message.add_int(status & 0xFFFFFFFF)
    return send_while_open(channel, message)
