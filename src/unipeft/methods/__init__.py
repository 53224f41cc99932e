"""unipeft.methods"""
