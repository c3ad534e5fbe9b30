"""The MQTT transport: `broker.Broker`, the one connection every MQTT user shares, and
`homeassistant`, the export of the hub's devices to Home Assistant.

Empty on purpose: importing the package never imports paho (`iot-gateway check` needs none).
"""
