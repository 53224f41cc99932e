"""unipeft.cli"""
