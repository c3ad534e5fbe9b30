"""The XMPP door: the session (`session.Session`), its front-ends (XEP-0323 `sensordata`,
XEP-0325 `control`, ad-hoc commands, rooms, phone-first chat, OMEMO, uploads) and what
leaves through it (`edge`). Nothing outside this folder imports slixmpp.

Empty on purpose: `iot-gateway check` imports `gateway.xmpp.redact` without slixmpp.
"""
