"""The centre's command line (``centre-node``) and its Flower ClientApp."""
