using System.Runtime.InteropServices;
using static Vmsnap.Live.Libvirt.LibvirtNative;

namespace Vmsnap.Live.Libvirt;

/// <summary>
/// A connection to libvirt and one domain of it. The connection's URI defaults as virsh's does (LIBVIRT_DEFAULT_URI, the
/// uri_default of libvirt's client configuration, else qemu:///system for root and qemu:///session for others). libvirt's
/// event loop runs on a thread of its own from the first connection on, so that QEMU's events reach <see cref="LibvirtMonitor"/>.
/// </summary>
internal sealed class LibvirtDomain : IDisposable
{
    private static readonly Lazy<bool> s_eventLoop = new(StartEventLoop, LazyThreadSafetyMode.ExecutionAndPublication);
    private nint _conn, _domain;

    private LibvirtDomain(nint conn, nint domain, string name, string uri)
    {
        _conn = conn;
        _domain = domain;
        Name = name;
        Uri = uri;
    }

    /// <summary>The domain's name.</summary>
    internal string Name { get; }

    /// <summary>The connection's URI, as libvirt resolved it.</summary>
    internal string Uri { get; }

    internal nint Connection => _conn;

    /// <summary>The libvirt version of the daemon at the other end of the connection (major * 1,000,000 + minor * 1,000 + release), 0 when unknown.</summary>
    internal ulong DaemonVersion => virConnectGetLibVersion(_conn, out ulong version) == 0 ? version : 0;

    internal nint Handle => _domain;

    /// <summary>Connects (<paramref name="uri"/> null: libvirt's default) and looks the domain up by name.</summary>
    /// <exception cref="OperationRefusedException">libvirt is missing, cannot be reached, or has no such domain.</exception>
    internal static LibvirtDomain Open(string? uri, string name)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        nint conn;
        try
        {
            _ = s_eventLoop.Value;
            conn = virConnectOpen(uri);
        }
        catch (DllNotFoundException e)
        {
            throw new OperationRefusedException($"libvirt's client library (libvirt.so.0, libvirt-qemu.so.0) is not installed: install libvirt0 (Debian: apt install libvirt0); {e.Message}");
        }
        if (conn == 0)
            throw new OperationRefusedException($"cannot connect to libvirt{(uri is null ? "" : $" at '{uri}'")}: {LastError()}; nothing was done");
        string resolved = TakeString(virConnectGetURI(conn)) ?? uri ?? "?";
        nint domain = virDomainLookupByName(conn, name);
        if (domain == 0)
        {
            string why = LastError();
            virConnectClose(conn);
            throw new OperationRefusedException($"libvirt ({resolved}) has no domain '{name}': {why}; nothing was done");
        }
        return new LibvirtDomain(conn, domain, name, resolved);
    }

    private static unsafe bool StartEventLoop()
    {
        // libvirt prints every error on stderr unless told otherwise; vmsnap reports them in its own messages.
        virSetErrorFunc(0, &IgnoreError);
        if (virEventRegisterDefaultImpl() != 0) return false;
        var loop = new Thread(() =>
        {
            while (virEventRunDefaultImpl() == 0) { }
        }) { IsBackground = true, Name = "vmsnap libvirt events" };
        loop.Start();
        return true;
    }

    [System.Runtime.InteropServices.UnmanagedCallersOnly]
    private static void IgnoreError(nint userData, nint error) { }

    /// <summary>The domain's state: running, paused, shut off, ... (libvirt's virDomainState).</summary>
    internal int State
    {
        get
        {
            if (virDomainGetState(_domain, out int state, out _, 0) != 0) throw Failed("reading the domain's state");
            return state;
        }
    }

    /// <summary>True while libvirt's connection is up.</summary>
    internal bool IsAlive => virConnectIsAlive(_conn) == 1;

    /// <summary>The domain's XML; <paramref name="flags"/> from virDomainXMLFlags.</summary>
    internal string Xml(uint flags) => TakeString(virDomainGetXMLDesc(_domain, flags)) ?? throw Failed("reading the domain's XML");

    /// <summary>The names of the domain's snapshots in libvirt's metadata.</summary>
    internal unsafe IReadOnlyList<string> SnapshotNames()
    {
        int n = virDomainListAllSnapshots(_domain, out nint* list, 0);
        if (n < 0) throw Failed("listing the domain's snapshots");
        var names = new List<string>(n);
        try
        {
            for (int i = 0; i < n; i++)
            {
                names.Add(Marshal.PtrToStringUTF8(virDomainSnapshotGetName(list[i])) ?? "");
                virDomainSnapshotFree(list[i]);
            }
        }
        finally
        {
            free((nint)list);
        }
        return names;
    }

    /// <summary>The name of libvirt's current snapshot of the domain, or null when it has none.</summary>
    internal string? CurrentSnapshot()
    {
        nint s = virDomainSnapshotCurrent(_domain, 0);
        if (s == 0) return null;
        try { return Marshal.PtrToStringUTF8(virDomainSnapshotGetName(s)); }
        finally { virDomainSnapshotFree(s); }
    }

    /// <summary>The XML libvirt keeps for snapshot <paramref name="name"/>, or null when it has no such snapshot.</summary>
    internal string? SnapshotXml(string name)
    {
        nint s = virDomainSnapshotLookupByName(_domain, name, 0);
        if (s == 0) return null;
        try { return TakeString(virDomainSnapshotGetXMLDesc(s, XmlSecure)) ?? throw Failed($"reading snapshot '{name}'"); }
        finally { virDomainSnapshotFree(s); }
    }

    /// <summary>Records a snapshot that exists on the images (REDEFINE: libvirt touches no image), optionally as the current one.</summary>
    internal void Redefine(string snapshotXml, bool current)
    {
        nint s = virDomainSnapshotCreateXML(_domain, snapshotXml, SnapshotCreateRedefine | (current ? SnapshotCreateCurrent : 0));
        if (s == 0) throw Failed("recording the snapshot in libvirt");
        virDomainSnapshotFree(s);
    }

    /// <summary>Removes libvirt's metadata of snapshot <paramref name="name"/> only (the images keep it).</summary>
    internal void ForgetSnapshot(string name)
    {
        nint s = virDomainSnapshotLookupByName(_domain, name, 0);
        if (s == 0) return;
        try
        {
            if (virDomainSnapshotDelete(s, SnapshotDeleteMetadataOnly) != 0) throw Failed($"removing libvirt's record of snapshot '{name}'");
        }
        finally { virDomainSnapshotFree(s); }
    }

    /// <summary>Stops the domain at once (virsh destroy).</summary>
    internal void Destroy()
    {
        if (virDomainDestroy(_domain) != 0) throw Failed("stopping the domain");
    }

    /// <summary>libvirt's last error, as an exception that says what was being done.</summary>
    internal static LiveSnapshotException Failed(string doing) => new($"libvirt failed {doing}: {LastError()}");

    public void Dispose()
    {
        if (_domain != 0) virDomainFree(_domain);
        if (_conn != 0) virConnectClose(_conn);
        _domain = _conn = 0;
    }
}
