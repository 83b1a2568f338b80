"""Networks (content encoders, fusion, two-tower) and the LightningModules that train them."""
