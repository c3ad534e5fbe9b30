"""iot-gateway: serial, GPIO and MQTT devices exposed over XMPP."""
