namespace Vmsnap.Qcow2;

/// <summary>No snapshot of the image has the ID or name asked for.</summary>
public sealed class SnapshotNotFoundException : VmsnapException
{
    /// <summary>Creates the error.</summary>
    /// <param name="idOrName">The ID or name that was looked up.</param>
    /// <param name="image">The image's path.</param>
    public SnapshotNotFoundException(string idOrName, string image)
        : this(idOrName, image, $"'{image}' has no snapshot with ID or name '{idOrName}'") { }

    /// <summary>Creates the error with a message of the caller's (e.g. naming a QEMU drive).</summary>
    /// <param name="idOrName">The ID or name that was looked up.</param>
    /// <param name="image">The image's path.</param>
    /// <param name="message">The message, naming the image and the ID or name.</param>
    public SnapshotNotFoundException(string idOrName, string image, string message) : base(message)
    {
        IdOrName = idOrName;
        Image = image;
    }

    /// <summary>The ID or name that was looked up.</summary>
    public string IdOrName { get; }

    /// <summary>The image's path.</summary>
    public string Image { get; }
}

/// <summary>
/// The image already has a snapshot with the name asked for, or one whose ID equals that name (a
/// lookup by ID or name would then be ambiguous). Nothing was changed.
/// </summary>
public sealed class SnapshotExistsException : VmsnapException
{
    /// <summary>Creates the error.</summary>
    /// <param name="name">The name asked for.</param>
    /// <param name="existingId">The ID of the snapshot that has the name (or that ID).</param>
    /// <param name="image">The image's path.</param>
    /// <param name="message">The message, naming the image, the name and the snapshot that has it.</param>
    public SnapshotExistsException(string name, string existingId, string image, string message) : base(message)
    {
        Name = name;
        ExistingId = existingId;
        Image = image;
    }

    /// <summary>The name asked for.</summary>
    public string Name { get; }

    /// <summary>The ID of the snapshot already there.</summary>
    public string ExistingId { get; }

    /// <summary>The image's path.</summary>
    public string Image { get; }
}
