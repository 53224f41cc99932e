"""unipeft.core"""
