"""hierfl's federated radon fit as a Flower App (see ``app.py``)."""
