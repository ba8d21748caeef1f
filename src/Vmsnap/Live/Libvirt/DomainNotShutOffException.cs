namespace Vmsnap.Live.Libvirt;

/// <summary>
/// A libvirt load was refused because the domain runs: libvirt restores only a shut-off domain. Nothing was
/// changed. Shut the domain down, or load with <c>force</c>, which stops it at once.
/// </summary>
public sealed class DomainNotShutOffException : VmsnapException
{
    /// <summary>Creates the error for domain <paramref name="domain"/>.</summary>
    /// <param name="domain">The domain's name.</param>
    public DomainNotShutOffException(string domain)
        : base($"domain '{domain}' is not shut off: libvirt restores a shut-off domain only; shut it down (virsh shutdown {domain}) " +
            "or let the load stop it at once (force); nothing was loaded")
    {
        Domain = domain;
    }

    /// <summary>The domain's name.</summary>
    public string Domain { get; }
}
