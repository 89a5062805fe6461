//! Curvature of the loss: Hessian- and Gauss–Newton-vector products, top eigenvalues, and the
//! Monte Carlo estimators of the paper (batch sharpness, GNI, IAS, λmax^b, trace, ...).
